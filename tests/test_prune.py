"""Width/depth pruning on tiny random models: exactness against masked/skipped originals, GQA, tied embeddings,
impossible targets, and every supported family pruning into a directory that reloads cleanly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_TEXT, make_tiny_model_dir
from minitron.config import MinitronError, load_config
from minitron.importance import load_scores, skipping
from minitron.prune import PruneConfig, PruneTargetError, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TINY_TEXT))
    return path


@pytest.fixture(scope="module")
def ids(tiny_tokenizer) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer(TINY_TEXT[0] + " " + TINY_TEXT[5])["input_ids"][:40]])


def prune(src: Path, out: Path, calib: Path | None = None, **kw) -> Path:
    return run(PruneConfig(model=str(src), out=str(out), calib=str(calib) if calib else None, calib_samples=6,
                           calib_seq_len=32, batch_size=3, **kw))


def load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def load_without_warnings(path: Path):
    """Load with transformers' logging at WARNING and Python warnings recorded: both must stay silent."""
    import logging
    import warnings

    import transformers

    records: list = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = transformers.logging.get_logger("transformers")
    old = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load(path)
            AutoTokenizer.from_pretrained(path)
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(old)
    assert not records and not [w for w in caught if "transformers" in str(w.filename)], (records, caught)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_identity_prune_reproduces_logits(tiny_model_dir, tmp_path, ids):
    out = prune(tiny_model_dir, tmp_path / "same", hidden_size=64, num_hidden_layers=4)  # the source's own shape
    torch.testing.assert_close(logits(load(out), ids), logits(load(tiny_model_dir), ids))


def masked_reference(src: Path, scores_dir: Path):
    """The original model with the pruned heads/neurons/channels zeroed (plan read back from the output)."""
    from minitron.adapters import Layout
    from minitron.prune import make_plan

    model = load(src)
    scores, _ = load_scores(scores_dir / "importance")
    cfg = json.loads((scores_dir / "config.json").read_text())
    src_l = Layout.from_config(model.config)
    plan = make_plan(scores, src_l, src_l.replace(**{k: cfg[k] for k in ("hidden_size", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads")}), [])
    H, Hp, hd = src_l.hidden_size, cfg["hidden_size"], src_l.head_dim
    cut = torch.ones(H, dtype=torch.bool)
    cut[plan.hidden] = False
    # RMSNorm divides by the RMS over H channels; the pruned model by the RMS over H' (same sum of squares).
    scale = math.sqrt(Hp / H)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, cut] = 0
        for norm in [model.model.norm] + [m for l in model.model.layers for m in (l.input_layernorm, l.post_attention_layernorm)]:
            norm.weight.mul_(scale)
            norm.weight[cut] = 0
        for i, layer in enumerate(model.model.layers):
            heads = torch.ones(src_l.num_attention_heads, dtype=torch.bool)
            heads[plan.heads[i]] = False
            layer.self_attn.o_proj.weight.view(H, -1, hd)[:, heads] = 0
            neurons = torch.ones(src_l.intermediate_size, dtype=torch.bool)
            neurons[plan.neurons[i]] = False
            layer.mlp.down_proj.weight[:, neurons] = 0
            layer.self_attn.o_proj.weight[cut] = 0  # nothing is written into pruned residual channels
            layer.mlp.down_proj.weight[cut] = 0
    return model, plan


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_width_prune_equals_masked_original(tmp_path, tiny_tokenizer, calib, ids, arch):
    src = make_tiny_model_dir(tmp_path / "src", tiny_tokenizer, arch=arch, rms_norm_eps=1e-12)
    out = prune(src, tmp_path / "w", calib, hidden_size=40, intermediate_size=72, num_attention_heads=2)
    ref, plan = masked_reference(src, out)
    assert len(plan.hidden) == 40 and plan.hidden.tolist() != list(range(40))  # a real selection
    torch.testing.assert_close(logits(load(out), ids), logits(ref, ids), atol=2e-5, rtol=1e-4)


def test_depth_prune_equals_skipped_layers(tiny_model_dir, tmp_path, ids):
    out = prune(tiny_model_dir, tmp_path / "d", layers_to_drop=[1, 2])
    orig = load(tiny_model_dir)
    from minitron.adapters import get_adapter

    with skipping(orig, get_adapter(orig.config), frozenset({1, 2})):
        expected = logits(orig, ids)
    pruned = load(out)
    assert pruned.config.num_hidden_layers == 2
    torch.testing.assert_close(logits(pruned, ids), expected)


def test_depth_by_metric_uses_scores(tiny_model_dir, tmp_path, calib):
    out = prune(tiny_model_dir, tmp_path / "d", calib, num_hidden_layers=2, depth_metric="lm_loss")
    scores, _ = load_scores(out / "importance")
    expected = sorted(scores["layer.lm_loss"].argsort()[:2].tolist())
    assert json.loads((out / "metrics.json").read_text())["dropped_layers"] == expected


def test_gqa_preserved(tiny_model_dir, tmp_path, calib):
    out = prune(tiny_model_dir, tmp_path / "h", calib, num_attention_heads=2)
    cfg = load(out).config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 2, 16)
    assert json.loads((out / "config.json").read_text())["head_dim"] == 16  # explicit in the saved config
    out = prune(tiny_model_dir, tmp_path / "kv", calib, num_key_value_heads=1)  # drop a whole KV group
    model = load(out)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)


def test_tied_embeddings_stay_tied(tmp_path, tiny_tokenizer, calib):
    src = make_tiny_model_dir(tmp_path / "tied", tiny_tokenizer, tie_word_embeddings=True)
    out = prune(src, tmp_path / "w", calib, hidden_size=32)
    model = load(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.shape[1] == 32


@pytest.mark.parametrize("kw, message", [
    (dict(hidden_size=128), "hidden_size=128 is larger than the source's 64"),
    (dict(num_hidden_layers=9), "num_hidden_layers=9 is larger"),
    (dict(num_attention_heads=3), "breaks the GQA grouping"),
    (dict(num_attention_heads=4, num_key_value_heads=1), "the source has only 2 per group"),
    (dict(intermediate_size=0), "must be >= 1"),
    (dict(params=1000), "no width-only shape meets params=1000"),
    (dict(params=1e9), "larger than the source"),
    (dict(layers_to_drop=[0, 7]), "indices must be in 0..3"),
    (dict(hidden_size=32, calib=None), "pass --calib DATA"),
])
def test_impossible_targets_fail_and_leave_nothing(tiny_model_dir, tmp_path, calib, kw, message):
    kw = {"calib": calib, **kw}
    with pytest.raises(MinitronError, match=message.replace("(", r"\(").replace("+", r"\+")):
        prune(tiny_model_dir, tmp_path / "out", **kw)
    assert list(tmp_path.iterdir()) == []


def test_a_shape_transformers_refuses_fails_before_any_work(tiny_model_dir, tmp_path):
    """hidden 62 with 4 heads: Llama's config validation refuses it; prune says so up front, writes nothing."""
    with pytest.raises(PruneTargetError, match="transformers refuses the pruned config"):
        prune(tiny_model_dir, tmp_path / "out", hidden_size=62)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tiny_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(MinitronError, match="--force"):
        prune(tiny_model_dir, tmp_path / "out", num_hidden_layers=3, layers_to_drop=[0])
    prune(tiny_model_dir, tmp_path / "out", layers_to_drop=[0], force=True)
    assert (tmp_path / "out" / "config.json").exists()


def test_rerun_keeps_the_same_config_and_redoes_another(tiny_model_dir, tmp_path, capsys):
    out = prune(tiny_model_dir, tmp_path / "out", layers_to_drop=[0])
    stamp = (out / "config.json").stat().st_mtime_ns
    prune(tiny_model_dir, out, layers_to_drop=[0])
    assert (out / "config.json").stat().st_mtime_ns == stamp and "is up to date" in capsys.readouterr().out
    prune(tiny_model_dir, out, layers_to_drop=[1])
    assert "layers_to_drop [0] -> [1]" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["dropped_layers"] == [1]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_family_prunes_and_reloads(tmp_path, tiny_tokenizer, calib, arch):
    src = make_tiny_model_dir(tmp_path / "src", tiny_tokenizer, arch=arch)
    out = prune(src, tmp_path / "out", calib, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                max_shard_size="100KB")
    model = load_without_warnings(out)
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers) == (48, 96, 3)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    src_cfg = json.loads((src / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling", "rms_norm_eps", "vocab_size"):
        assert out_cfg.get(key) == src_cfg.get(key)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    gen = json.loads((out / "generation_config.json").read_text())
    assert isinstance(gen["eos_token_id"], list) and len(gen["eos_token_id"]) == 2
    card = (out / "README.md").read_text()
    for field in ("source", "target", "importance method", "calibration data", "parameters"):
        assert f"| {field} |" in card
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card


def test_cached_scores_give_the_same_model(tiny_model_dir, tmp_path, calib):
    a = prune(tiny_model_dir, tmp_path / "a", calib, hidden_size=40, num_hidden_layers=3)
    b = prune(tiny_model_dir, tmp_path / "b", scores=str(a / "importance"), hidden_size=40, num_hidden_layers=3)
    for name, t in load(a).state_dict().items():
        torch.testing.assert_close(load(b).state_dict()[name], t, rtol=0, atol=0)


@pytest.mark.parametrize("target", [dict(hidden_size=40, intermediate_size=72, num_attention_heads=2),
                                    dict(num_hidden_layers=2, depth_metric="block_importance")])
def test_row_blocks_give_the_same_scores_and_weights(tiny_model_dir, tmp_path, calib, monkeypatch, target):
    """The 8B path on a tiny model: the layer-by-layer importance pass looks the embedding up a block of rows at a
    time, and every tensor is read (and the embedding / lm_head written) in blocks. Blocks of 3 rows give the
    same scores and bit-identical pruned weights as whole tensors (one block each at the default size)."""
    from safetensors.torch import load_file

    import minitron.weights as weights

    kw = dict(mode="layers", **target)
    whole = prune(tiny_model_dir, tmp_path / "whole", calib, **kw)
    reads = []
    read_rows = weights.ShardedCheckpoint.read_rows
    monkeypatch.setattr(weights.ShardedCheckpoint, "read_rows", lambda self, key, a, b: reads.append(
        (key, a, b)) or read_rows(self, key, a, b))
    monkeypatch.setattr(weights, "ROW_BLOCK_BYTES", 3 * 64 * 4)  # 3 rows of the 64-wide fp32 embedding
    blocks = prune(tiny_model_dir, tmp_path / "blocks", calib, **kw)
    n_vocab = weights.ShardedCheckpoint(tiny_model_dir).entries["model.embed_tokens.weight"][2][0]
    embed = [r for r in reads if r[0] == "model.embed_tokens.weight"]
    assert len(embed) > n_vocab // 3 and all(b - a <= 3 for _, a, b in embed)  # the lookup and the writer in blocks
    assert {r[0] for r in reads} >= {"lm_head.weight", "model.layers.0.mlp.up_proj.weight"}
    a, b = ({k: v for f in weights.weight_files(d) for k, v in load_file(f).items()} for d in (whole, blocks))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_scores(whole / "importance")[0], load_scores(blocks / "importance")[0]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["llama31-8b-4b-width", "llama31-8b-4b-depth", "demo-width", "demo-depth"])
def test_shipped_targets_parse(name):
    path = ROOT / "configs" / "prune" / f"{name}.yaml"
    assert path.read_text().startswith("#")  # comment header
    cfg = load_config(PruneConfig, path, section="prune")
    from minitron.prune import requested_shape

    assert requested_shape(PruneConfig(target=str(path)))
    assert cfg.depth_metric in ("block_importance", "lm_loss", "mc_block")


def test_paper_shapes_parameter_counts():
    from transformers import LlamaConfig

    from minitron.adapters import Layout

    src = Layout.from_config(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=128, model_type="llama"))
    assert src.num_params() == 8_030_261_248  # Llama-3.1-8B
    assert round(src.replace(hidden_size=3072, intermediate_size=9216).num_params() / 1e9, 1) == 4.5
    assert round(src.replace(num_hidden_layers=16).num_params() / 1e9, 1) == 4.5


def test_bench_peak_rss_is_the_childs_own():
    """The 8B bench's peak RSS is the prune process's own (VmHWM): ``ru_maxrss`` of a child started by a parent
    that once held 1 GiB reads at least 1 GiB (Linux carries it across exec), which hid the prune's 2.5 GiB
    behind the 4.4 GiB of the bench's own checkpoint writer."""
    import subprocess
    import sys

    x = torch.ones(2**28)  # 1 GiB in this (parent) process, then freed
    del x
    code = ("import resource; from minitron.pipeline.bench.memory import peak_rss; "
            "print(peak_rss() / 2**30, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                               check=True).stdout.split())
    assert inherited >= 1.0 > 0.8 > own, (own, inherited)


def test_bench_random_checkpoint_streams_blocks(tmp_path, monkeypatch):
    """The 8B bench's random checkpoint (written a block of rows at a time) on a tiny Llama: transformers loads
    it, norms are 1 and the other weights N(0, 0.02)."""
    from transformers import LlamaConfig

    from minitron.pipeline.bench import prune as bench

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    blocks = []
    real = bench._random_weight
    monkeypatch.setattr(bench, "_random_weight", lambda *a: (blocks.append(a[0]) or b for b in real(*a)))
    monkeypatch.setattr(bench, "RANDOM_BLOCK", 8 * 64)  # 8 rows of the embedding
    model = AutoModelForCausalLM.from_pretrained(bench.write_random_checkpoint(tmp_path / "ck", cfg, n_shards=2))
    assert blocks.count("model.embed_tokens.weight") == math.ceil(300 / 8)
    assert set(blocks) == set(model.state_dict())  # every tensor drawn in blocks
    assert (model.model.norm.weight == 1).all()
    assert abs(model.model.embed_tokens.weight.float().std().item() - 0.02) < 2e-3
