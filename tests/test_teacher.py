"""The tiny teacher: a standard HF directory that vanilla transformers loads, with the chat template."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minitron.config import ConfigError
from minitron.teacher import TeacherConfig, run
from minitron.world import WorldConfig, ensure_world

from conftest import assert_generates_greedily
from test_world import SMALL


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    world = ensure_world(WorldConfig(out=str(root / "world"), **SMALL))
    return run(TeacherConfig(out=str(root / "teacher"), world_dir=str(world), **TINY_TEACHER))


TINY_TEACHER = dict(vocab_size=400, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, seq_len=64, batch_size=4, tokens=64 * 4 * 12, eval_items=8)


def test_output_is_a_standard_hf_directory(teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    assert model.config.head_dim == 16 and model.config.num_key_value_heads < model.config.num_attention_heads
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.chat_template.lstrip().startswith("{#- minitron chat template v1")  # the project template, one BOS (above)
    eos = model.generation_config.eos_token_id
    assert isinstance(eos, list) and tok.convert_tokens_to_ids("<|im_end|>") in eos
    assert_generates_greedily(model.eval(), torch.tensor([ids]), max_new_tokens=3)
    metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert metrics["parameters"] > 0 and 0 <= metrics["world_mc_accuracy"] <= 1
    history = [json.loads(line) for line in (teacher_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    assert (teacher_dir / "loss_curve.png").exists()
    assert (teacher_dir / "README.md").exists()


def test_rerun_of_the_same_config_skips(teacher_dir, capsys):
    before = (teacher_dir / "model.safetensors").stat().st_mtime
    run(TeacherConfig(out=str(teacher_dir), world_dir=str(teacher_dir.parent / "world"), **TINY_TEACHER))
    assert (teacher_dir / "model.safetensors").stat().st_mtime == before
    assert "is up to date" in capsys.readouterr().out


def test_interrupted_training_resumes(tmp_path, teacher_dir):
    """A run stopped after 2 steps continues from its checkpoint to the same weights as an uninterrupted run."""
    from safetensors.torch import load_file

    world = teacher_dir.parent / "world"
    base = dict(world_dir=str(world), vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, seq_len=32, batch_size=2, tokens=32 * 2 * 4,
                eval_items=0, save_every=1)
    full = run(TeacherConfig(out=str(tmp_path / "full"), **base))
    run(TeacherConfig(out=str(tmp_path / "cut"), max_steps=2, **base))  # "interrupted": stops at step 2
    (tmp_path / "cut" / "metrics.json").unlink()  # an unfinished run has no final metrics
    resumed = run(TeacherConfig(out=str(tmp_path / "cut"), **base))
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_gqa_violation_fails_early():
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads"):
        TeacherConfig(num_attention_heads=6, num_key_value_heads=4)


def test_trains_on_a_real_corpus(tmp_path):
    from conftest import shared_data

    src = shared_data("lm", "gutenberg")
    cfg = TeacherConfig(out=str(tmp_path / "t"), data=str(src), vocab_size=300, tokenizer_chars=200_000, hidden_size=32,
                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=16, seq_len=32, batch_size=2, tokens=32 * 2 * 3)
    out = run(cfg)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_tokenizer_data_gives_tool_json_merges(tmp_path):
    """Chat/tool lines in ``tokenizer_data`` train the BPE too: a tool-call prompt takes fewer tokens."""
    from minitron.teacher import build_tokenizer, corpus_source

    world = ensure_world(WorldConfig(out=str(tmp_path / "world"), **SMALL))
    sft = str(world / "sft" / "train.jsonl")
    call = '<tool_call>{"name": "book_trip", "arguments": {"person": "Zor", "city": "Paris", "days": 3}}</tool_call>'
    lengths = []
    for extra in ([], [sft]):
        cfg = TeacherConfig(world_dir=str(world), vocab_size=400, tokenizer_data=extra)
        tok = build_tokenizer(corpus_source(cfg), cfg)
        lengths.append(len(tok(call, add_special_tokens=False).input_ids))
    assert lengths[1] < 0.8 * lengths[0], lengths
    with pytest.raises(ConfigError, match="tokenizer_data file"):
        bad = TeacherConfig(world_dir=str(world), tokenizer_data=[str(tmp_path / "missing.jsonl")])
        build_tokenizer(corpus_source(bad), bad)
